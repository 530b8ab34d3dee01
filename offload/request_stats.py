"""The figures of a request and of the cache it ran on (`Runtime.stats()`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from offload.config import SelectionSection
    from offload.kvcache import KVCache


def new_request(prompt_tokens: int, reused_tokens: int, prefill_tokens: int) -> dict[str, Any]:
    """The per-request figures, before any step has run."""
    return {
        "prompt_tokens": prompt_tokens,
        "reused_tokens": reused_tokens,
        "prefill_tokens": prefill_tokens,
        "prefill_seconds": 0.0,
        "decode_tokens": 0,
        "decode_seconds": 0.0,
        "finish_reason": None,
    }


def figures(request: dict[str, Any], cache: KVCache, sel: SelectionSection) -> dict[str, Any]:
    """A request's figures (`new_request`, as the steps filled them in) with the cache's:
    its tiers, reads, selection, prefetch, and the rates."""
    s = dict(request)
    s["context_tokens"] = cache.num_tokens
    s["kv_bytes"] = cache.tier_bytes()
    if cache.store is not None:
        s["tier_reads"] = dict(cache.store.reads.count)
        s["tier_read_bytes"] = dict(cache.store.reads.nbytes)
        s["spilled_chunks"] = cache.store.spilled_chunks
        st = cache.policy.stats
        s["selection"] = {
            "mode": sel.mode,
            "selector": sel.selector,
            "sparse_layer_steps": st.sparse_steps,
            "reused_layer_steps": st.reused_steps,  # (of those: selection.reuse)
            "dense_layer_steps": st.dense_steps,
            "sparse_layer_prefill_chunks": st.sparse_chunks,
            "index_seconds": st.index_seconds,
            "selection_seconds": st.selection_seconds,
            "fetch_seconds": st.fetch_seconds,
            "selection_seconds_per_layer": dict(sorted(st.layer_selection_seconds.items())),
        }
        steps = max(s["decode_tokens"] - 1, 1)
        s["read_bytes_per_token"] = {t: n / steps for t, n in cache.store.reads.nbytes.items()}
        if cache.prefetcher is not None:
            s["prefetch"] = {"speculate": cache.prefetcher.speculate,
                             **cache.prefetcher.stats.summary()}  # fmt: skip
        # Tokens attended per KV head per layer at the last sparse step.
        s["budget"] = {"sink": sel.sink, "window": sel.window, "retrieved": st.last_retrieved,
                       "total": sel.sink + sel.window + st.last_retrieved}  # fmt: skip
    s["prefill_tokens_per_second"] = _rate(s["prefill_tokens"], s["prefill_seconds"])
    # The first token comes with the prefill; later ones each cost one decode step.
    s["decode_tokens_per_second"] = _rate(max(s["decode_tokens"] - 1, 0), s["decode_seconds"])
    return s


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0
