"""The scan selectors: `exact` (oracle), `summary` (low-bit keys), `chunk` (Quest bound).

Each scores the middle range [lo, hi) and returns [H, k] ascending token ids.
They keep no state of their own: everything they read is in the `LayerView`.
"""

from __future__ import annotations

import math

import torch

from retrieval.base import (
    LayerView,
    exact_logits,
    range_mask,
    row_max,
    row_softmax_sum,
    top_k_ids,
)
from storage.abstracts import upper_bound_scores
from storage.quant import score_keys


class _Stateless:
    def update(self, view: LayerView, progress=None) -> None:
        pass

    def truncate(self, num_tokens: int) -> None:
        pass


class ExactTopK(_Stateless):
    """True top-k by exact q . k over full-precision keys. It reads every key: on a CPU,
    where they are in place, that is cheap at a few thousand tokens; elsewhere it is the
    evaluation oracle."""

    def select(self, q, view: LayerView, lo, hi, k):
        # In place (no copy) where the host tier is this device's memory.
        keys = view.keys.view()[:, lo:hi] if view.keys is not None else view.read_keys(lo, hi)
        scale = q.shape[-1] ** -0.5
        weights = row_softmax_sum(q, lambda rows: exact_logits(rows, keys) * scale)
        return top_k_ids(weights, None, k) + lo


class SummaryScan(_Stateless):
    """Scores every summarized token with its low-bit key (never unpacked whole)."""

    def select(self, q, view: LayerView, lo, hi, k):
        assert hi <= view.summarized_tokens, f"tokens up to {hi} must be summarized"
        scale = q.shape[-1] ** -0.5
        outside = ~range_mask(view.summarized_tokens, lo, hi, q.device)

        def logits(rows):  # [H, G, T_c]
            return (score_keys(view.summaries, rows) * scale).masked_fill(outside, float("-inf"))

        return top_k_ids(row_softmax_sum(q, logits), None, k)


class ChunkBound(_Stateless):
    """Quest: upper-bound q . k per chunk from min/max abstracts, keep the best chunks' tokens."""

    def select(self, q, view: LayerView, lo, hi, k):
        C = view.chunk_size
        bound = row_max(q, lambda rows: upper_bound_scores(view.abstracts, rows))  # [H, n]
        n = bound.shape[-1]
        c_lo, c_hi = lo // C, min(n, math.ceil(hi / C))
        valid_chunk = range_mask(n, c_lo, c_hi, bound.device)
        bound = bound.masked_fill(~valid_chunk, float("-inf"))
        m = min(c_hi - c_lo, math.ceil(k / C) + 2)  # two boundary chunks may be partly outside
        chunks = torch.topk(bound, m, dim=-1).indices  # [H, m], best first
        ids = (chunks[:, :, None] * C + torch.arange(C, device=chunks.device)).reshape(
            chunks.shape[0], -1
        )
        rank = torch.arange(m, device=ids.device).repeat_interleave(C).expand_as(ids)
        priority = (-rank).float().masked_fill((ids < lo) | (ids >= hi), float("-inf"))
        return top_k_ids(priority, ids, k)
