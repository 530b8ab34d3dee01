"""The Triton kernels as torch operators (`torch.library.custom_op`), so that
`torch.compile` keeps each one as a single opaque call in the graph it builds of a
decode step (offload/graphs.py, `compile_step`) instead of breaking the graph at
Triton's launcher. Each has a fake implementation that gives only the output's shape.

`Backend` calls these only where the step is compiled: an operator call costs about
90 us more from Python than the kernel's own launcher (this CPU), which the eager paths
would pay at every layer.
"""

from __future__ import annotations

import torch

from offload.kernels import candidates as candidate_kernels
from offload.kernels import decode_attention as attention_kernels
from offload.kernels import gather as gather_kernels
from offload.kernels import hit_cache as hit_kernels
from offload.kernels import ranking
from storage.quant import QuantKeys


@torch.library.custom_op("offload::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: torch.Tensor,
    k2: torch.Tensor | None = None,
    v2: torch.Tensor | None = None,
    length2: torch.Tensor | None = None,
    idx2: torch.Tensor | None = None,
    skip: bool = False,
) -> torch.Tensor:
    return attention_kernels.decode_attention(q, k, v, length, k2, v2, length2, idx2, skip)


@decode_attention.register_fake
def _(q, k, v, length, k2=None, v2=None, length2=None, idx2=None, skip=False):
    return q.new_empty(q.shape)  # (contiguous, as the kernel's output)


@torch.library.custom_op("offload::gather_kv", mutates_args=())
def gather_kv(slab: torch.Tensor, slot_table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return gather_kernels.gather_kv(slab, slot_table, ids)


@gather_kv.register_fake
def _(slab, slot_table, ids):
    return slab.new_empty(2, ids.shape[0], ids.shape[1], slab.shape[-1], device=ids.device)


@torch.library.custom_op("offload::fetch_into", mutates_args=("cache",))
def fetch_into(
    slab: torch.Tensor,
    slot_table: torch.Tensor,
    ids: torch.Tensor,
    rows: torch.Tensor,
    dst: torch.Tensor,
    cache: torch.Tensor,
) -> None:
    gather_kernels.fetch_into(slab, slot_table, ids, rows, dst, cache)


@fetch_into.register_fake
def _(slab, slot_table, ids, rows, dst, cache):
    return None


@torch.library.custom_op(
    "offload::lookup", mutates_args=("slot_of", "token_of", "used", "clock", "counts")
)
def lookup(
    ids: torch.Tensor,
    k_valid: torch.Tensor,
    slot_of: torch.Tensor,
    token_of: torch.Tensor,
    used: torch.Tensor,
    clock: torch.Tensor,
    counts: torch.Tensor,
    use: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hit_kernels.lookup(ids, k_valid, slot_of, token_of, used, clock, counts, use)


@lookup.register_fake
def _(ids, k_valid, slot_of, token_of, used, clock, counts, use=None):
    return (
        ids.new_empty(ids.shape),
        ids.new_empty(ids.shape, dtype=torch.bool),
        ids.new_empty(ids.shape),
    )


@torch.library.custom_op("offload::successors", mutates_args=())
def successors(ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hit_kernels.successors(ids, valid)


@successors.register_fake
def _(ids, valid):
    H, k = ids.shape
    return ids.new_empty(H, 2 * k), ids.new_empty(H, 2 * k, dtype=torch.bool)


def rerank_weights(q, summaries: QuantKeys, ids, count, sm_scale: float) -> torch.Tensor:
    s = summaries
    return _rerank_weights(q, s.codes, s.scale, s.zero, ids, count, s.bits, s.group, sm_scale)


@torch.library.custom_op("offload::rerank_weights", mutates_args=())
def _rerank_weights(
    q: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bits: int,
    group: int,
    sm_scale: float,
) -> torch.Tensor:
    summaries = QuantKeys(bits, group, codes, scale, zero)
    return candidate_kernels.rerank_weights(q, summaries, ids, count, sm_scale)


@_rerank_weights.register_fake
def _(q, codes, scale, zero, ids, count, bits, group, sm_scale):
    return q.new_empty(ids.shape, dtype=torch.float32)


@torch.library.custom_op("offload::score_clusters", mutates_args=())
def score_clusters(q: torch.Tensor, centroids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return candidate_kernels.score_clusters(q, centroids, bias)


@score_clusters.register_fake
def _(q, centroids, bias):
    return centroids.new_empty(centroids.shape[:2])


@torch.library.custom_op("offload::cluster_candidates", mutates_args=())
def cluster_candidates(
    take: torch.Tensor, assign: torch.Tensor, lo: int, hi: torch.Tensor, N: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return candidate_kernels.cluster_candidates(take, assign, lo, hi, N)


@cluster_candidates.register_fake
def _(take, assign, lo, hi, N):
    H = assign.shape[0]
    return assign.new_empty(H, N, dtype=torch.long), assign.new_empty(H, dtype=torch.long)


@torch.library.custom_op("offload::top_ids", mutates_args=())
def top_ids(
    weights: torch.Tensor, ids: torch.Tensor, k: int, k_valid: torch.Tensor | None
) -> torch.Tensor:
    return ranking.top_ids(weights, ids, k, k_valid)


@top_ids.register_fake
def _(weights, ids, k, k_valid):
    return ids.new_empty(ids.shape[0], k)


@torch.library.custom_op("offload::take_clusters", mutates_args=())
def take_clusters(
    scores: torch.Tensor, counts: torch.Tensor, factor: int, k: int, k_valid: torch.Tensor | None
) -> torch.Tensor:
    return ranking.take_clusters(scores, counts, factor, k, k_valid)


@take_clusters.register_fake
def _(scores, counts, factor, k, k_valid):
    return scores.new_empty(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool)
