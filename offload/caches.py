"""Building a runtime's KV caches, and the move from one kind to the other.

    device cache   all KV in one device tensor per layer: `selection.mode = "full"`
                   (unbounded), and mode "auto", bounded by `kv.device_bytes` where
                   host memory is not the compute device's (CUDA), by `kv.host_bytes`
                   where it is (a CPU: the fastest there, docs/performance.md)
                   (`device_kv_tokens`)
    tiered store   device / host / disk tiers with per-step selection: every other
                   mode, sessions, and a bounded device cache that a request would
                   take past its bound (`KVCache.move_to_tiers`, called through
                   `KVCache.outgrow`, so the same cache object carries on)

Where the host tier is not the compute device's memory (CUDA), a tiered cache keeps
the dense layers' KV on the device too, prefills an empty cache layer by layer, and
decodes through the fixed-shape tiered step with its device hit caches.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from offload.attention import SparsePolicy
from offload.budgets import resolve_budgets
from offload.config import human_bytes
from offload.errors import ConfigError
from offload.kvcache import KVCache
from storage.disk import StorageError
from storage.stale import cache_dir_name, sweep_stale
from storage.tiered import TieredStore

if TYPE_CHECKING:
    from offload.runtime import Runtime


@functools.cache
def _sweep_once(disk_dir: Path) -> int:
    """Once per process and directory: remove the spill folders dead processes left."""
    return sweep_stale(disk_dir)


def new_cache(rt: Runtime, tiered: bool = False) -> KVCache:
    """A fresh cache for `rt`: the device cache or the tiered store (module docstring);
    `tiered` asks for the tiered store whatever the mode (sessions)."""
    a, sel = rt.args, rt.config.selection
    limit = None
    if not tiered and sel.mode == "auto":
        limit = device_kv_tokens(rt)
    if not tiered and (sel.mode == "full" or limit):
        cache = KVCache.dense(
            a.num_layers, a.num_kv_heads, a.head_dim, rt.model.dtype, rt.device,
            limit if limit and limit < a.max_seq_len else None,
        )  # fmt: skip
        cache.outgrow = functools.partial(move_to_tiers, rt)
        if rt.backend.fixed_shape:
            cache.use_step(rt.model, rt.backend)
    else:
        cache = _tiered_cache(rt, rt.device)
        _setup_tiered(rt, cache)
    cache.fresh = functools.partial(new_cache, rt)
    return cache


def host_cache(rt: Runtime) -> KVCache:
    """A tiered cache held in host memory and on disk only, whatever the device: a device
    cache is saved through it and a session that fits one is loaded through it, layer
    by layer, so none of its other parts (summaries, recent window) sits on the device
    beside that KV."""
    return _tiered_cache(rt, torch.device("cpu"))


def _tiered_cache(rt: Runtime, device: torch.device) -> KVCache:
    store, policy = _tiered_parts(rt, device)
    try:
        return KVCache.tiered(store, policy)
    except StorageError as e:
        raise ConfigError(str(e)) from None


def dense_in_host_memory(rt: Runtime) -> bool:
    """Is mode "auto"'s device cache in host memory, where the tiers are (a CPU)? Then a
    session is saved from the tiers (the KV moved there, not held twice) and loaded
    into them (their threads read it in while it is used)."""
    return not rt.backend.remote_host and rt.config.selection.mode == "auto"


def device_kv_tokens(rt: Runtime) -> int:
    """How many tokens of KV the bounded device cache holds before it moves to the
    tiers, from `kv.device_bytes` (on a CPU, whose KV is in host memory either way,
    `kv.host_bytes`). One layer's worth is kept back: a layer's buffers grow by
    reallocation, so the old ones briefly stay beside the new."""
    budgets = resolve_budgets(rt.config.kv, rt.device)
    budget = budgets.device_bytes if rt.backend.remote_host else budgets.host_bytes
    L = rt.layout
    return min(budget // (L.token_bytes + L.token_bytes_per_layer), rt.args.max_seq_len)


def check_device_room(rt: Runtime, cache: KVCache, num_tokens: int, what: str) -> None:
    """Where the host tier is not the device's memory (CUDA), refuse `what` (a request
    that can reach `num_tokens` tokens of context, or a session of that many) when the
    tiered KV's device part would then pass `kv.device_bytes` (ConfigError naming the
    parts): `offload plan`'s arithmetic, checked before anything is computed, where the
    alternative is running out of device memory partway. A device cache that holds the
    tokens within its own bound (or mode "full") is not tiered and passes."""
    if not rt.backend.remote_host or (cache.store is None and cache.fits(num_tokens)):
        return
    from offload.plan import plan_for_config  # (it reads model files for the CLI)

    budget = resolve_budgets(rt.config.kv, rt.device).device_bytes
    rows = plan_for_config(rt.args, num_tokens, budget, 0, rt.config).kv_rows_on_device
    need = sum(r.nbytes for r in rows)
    if need > budget:
        parts = ", ".join(f"{r.what.split(' (')[0]} {human_bytes(r.nbytes)}" for r in rows)
        raise ConfigError(
            f"{what} reaches {num_tokens:,} tokens of context; there the KV kept on the "
            f"device takes {human_bytes(need)} ({parts}), over kv.device_bytes = "
            f"{human_bytes(budget)}: raise kv.device_bytes, lower selection.dense_layers "
            f"or selection.retrieved, or use fewer tokens (`offload plan` shows each part)"
        )


def check_room(rt: Runtime, cache: KVCache, num_tokens: int, what: str) -> None:
    """`check_device_room` and `check_disk_room`: both refusals, before anything is
    computed."""
    check_device_room(rt, cache, num_tokens, what)
    check_disk_room(rt, cache, num_tokens, what)


def check_disk_room(rt: Runtime, cache: KVCache, num_tokens: int, what: str) -> None:
    """Refuse `what` (reaching `num_tokens` tokens of context) where the chunks it would
    spill to the disk tier, those past the host tier's room, would pass the disk's
    (`kv.disk_bytes`, else the free space of `kv.disk_dir` less a margin): the spill
    would fail partway, after minutes of prefill. Spilled chunks only: a loaded session's
    files are the session's, and the file framing is not counted (so nothing that would
    fit is refused)."""
    if cache.store is None and cache.fits(num_tokens):
        return
    L, store = rt.layout, cache.store
    per_layer = L.num_chunks(num_tokens)
    if store is None:  # (it moves to a new store as it passes its bound)
        b = resolve_budgets(rt.config.kv, rt.device)
        spilled = per_layer * L.num_layers - b.host_bytes // L.chunk_bytes
        room, where = b.disk_bytes, b.disk_dir
    else:
        d, disk = store.directory, store.disk
        new = sum(max(0, per_layer - L.num_chunks(n)) for n in store.lengths)
        spilled = new - max(0, d.host_capacity - d.host_count)
        room, where = disk.budget_bytes - disk.used_bytes, disk.directory
    need = max(0, spilled) * L.disk_bytes_per_chunk()
    if need > room:
        raise ConfigError(
            f"{what} reaches {num_tokens:,} tokens of context; {human_bytes(need)} of its KV "
            f"would then spill to disk past kv.host_bytes, and {where} has room for "
            f"{human_bytes(max(0, room))} (kv.disk_bytes, else its free space less a margin): "
            "raise kv.host_bytes, set kv.disk_dir to a disk with room, or use fewer tokens"
        )


def move_to_tiers(rt: Runtime, cache: KVCache) -> None:
    """`KVCache.outgrow` of the device caches made here: the same cache, now tiered."""
    cache.move_to_tiers(*_tiered_parts(rt, rt.device), mirrors=rt.backend.remote_host)
    _setup_tiered(rt, cache)


def _tiered_parts(rt: Runtime, device: torch.device) -> tuple[TieredStore, SparsePolicy]:
    """An empty tiered store for `device` (budgets from the config or the machine) and
    its policy."""
    a, sel, kv = rt.args, rt.config.selection, rt.config.kv
    b = resolve_budgets(kv, rt.device)
    _sweep_once(b.disk_dir)
    store = TieredStore(
        rt.layout, rt.model.dtype, device, host_bytes=b.host_bytes,
        disk_dir=b.disk_dir / cache_dir_name(),
        disk_bytes=b.disk_bytes, sink=sel.sink, window=sel.window, spill_batch=kv.spill_batch,
        # only the chunk selector reads abstracts: elsewhere they wait in host memory
        abstracts_on_device=sel.selector == "chunk", max_tokens=a.max_seq_len,
    )  # fmt: skip
    policy = SparsePolicy(
        sel, a.num_layers, a.num_kv_heads, a.head_dim, nearest=rt.backend.nearest_centroids,
        reuse=sel.reuses(rt.device),
    )  # fmt: skip
    return store, policy


def _setup_tiered(rt: Runtime, cache: KVCache) -> None:
    sel = rt.config.selection
    prefetch = sel.prefetch
    if prefetch == "auto":  # measured: on a CPU both cost more than they save
        prefetch = "on" if rt.device.type == "cuda" else "off"
    if rt.backend.remote_host:
        cache.mirror_dense_layers(rt.device)
        cache.layered_prefill = True
        if rt.backend.fixed_shape:  # the step's hit caches: see offload/step_cache.py
            cache.use_step(rt.model, rt.backend, sel.hit_cache if prefetch != "off" else None)
    if prefetch != "off":
        cache.set_prefetch(rt.model, prefetch, sel.hit_cache)
