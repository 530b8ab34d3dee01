"""The `Selector` protocol and what a selector may read about one layer.

A selector picks, per KV head, the `k` tokens of the middle range [lo, hi) (after
the sink, before the recent window) that the current query should attend to.
Sink and window are always attended and are not the selector's business.

GQA: the G query heads sharing a KV head get one selection, their scores
aggregated: max of logits in coarse stages (clusters, chunks), sum of softmax
in the final top-k (measured best in DESIGN.md section 3). A prefill chunk of S
positions selects the same way with all its G x S queries as the rows (one
selection for the chunk); `row_max` and `row_softmax_sum` score them a block of
rows at a time, since their logits at once would not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from storage.abstracts import ChunkAbstracts
from storage.layout import HeadRows
from storage.quant import QuantKeys


@dataclass
class LayerView:
    """One layer's device-side summaries plus a reader of full-precision keys.

    summaries: low-bit keys of every token of the completed chunks (tokens 0 .. T_c-1)
    abstracts_of(): min/max/mean of each completed chunk (`abstracts`; read only by the
          chunk selector: a loaded session's arrive after the load)
    read_keys(a, b): full-precision keys [H, b-a, D] of tokens a..b-1 (host/disk reads)
    keys: every token's full-precision key in place, when the host tier is the compute
          device's memory (CPU) and holds them all; None otherwise. There, scoring exact
          keys costs less than unpacking low-bit ones, and is exact.
    host_keys(a, b): `read_keys`'s keys in host memory, where those are on a GPU (None:
          `read_keys`): what a batch of new tokens joining the index reads, so that it
          waits for no device work (on CUDA it runs while a decode step does)
    """

    summaries: QuantKeys
    abstracts_of: Callable[[], ChunkAbstracts]
    chunk_size: int
    num_tokens: int
    read_keys: Callable[[int, int], torch.Tensor]
    keys: HeadRows | None = None
    host_keys: Callable[[int, int], torch.Tensor] | None = None

    @property
    def abstracts(self) -> ChunkAbstracts:
        return self.abstracts_of()

    @property
    def summarized_tokens(self) -> int:
        return self.summaries.num_tokens


class Selector(Protocol):
    def select(self, q: torch.Tensor, view: LayerView, lo: int, hi: int, k: int) -> torch.Tensor:
        """q: [H, G, D] (or [H, G x S, D]: a prefill chunk's queries) -> token ids [H, k]
        in [lo, hi), distinct per head, ascending."""
        ...

    def update(self, view: LayerView, progress: Callable[[int, int], None] | None = None) -> None:
        """Absorb tokens appended since the last update (an index refresh)."""
        ...

    def truncate(self, num_tokens: int) -> None:
        """Forget tokens from `num_tokens` on."""
        ...


def coarse_max(scores: torch.Tensor) -> torch.Tensor:
    """[H, G, N] -> [H, N]: max of logits over the query heads of a group."""
    return scores.amax(dim=1)


def clusters_taken(scores: torch.Tensor, counts: torch.Tensor, want) -> torch.Tensor:
    """scores [H, NC] of each cluster, counts [H, NC] (tokens per cluster) -> [H, NC] bool:
    in the order of the scores, the clusters before the running count of tokens reaches
    `want` (a number, or a tensor that broadcasts to [H, 1]), and the one that reaches
    it (at least one per head)."""
    ranked = torch.argsort(scores, dim=-1, descending=True)
    cum = torch.gather(counts, 1, ranked).cumsum(1)
    n_clusters = (cum < want).sum(1, keepdim=True) + 1  # [H, 1]
    rank_ok = torch.arange(ranked.shape[1], device=ranked.device)[None, :] < n_clusters
    return torch.zeros_like(rank_ok).scatter_(1, ranked, rank_ok)


def exact_logits(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [H, G, D] against keys [H, n, D] -> float32 logits [H, G, n] (unscaled). The
    product is taken as keys @ q^T, the layout CPU kernels run about 3x faster."""
    return torch.matmul(keys, q.to(keys.dtype).transpose(1, 2)).transpose(1, 2).float()


def fine_softmax_sum(scores: torch.Tensor) -> torch.Tensor:
    """[H, G, N] logits q . k -> [H, N]: each query head's attention softmax over N
    (at the attention temperature 1/sqrt(D), which the caller has applied), summed
    over the group. Entries at -inf get zero weight; a row with none valid stays 0.
    """
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0).sum(dim=1)


ROW_BLOCK = 64  # query rows scored at a time (a decode step has G <= 64 rows: one block)


def row_max(q: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`coarse_max(logits(q))` for rows q [H, R, D], scored `ROW_BLOCK` rows at a time."""
    out = None
    for r in range(0, q.shape[1], ROW_BLOCK):
        m = coarse_max(logits(q[:, r : r + ROW_BLOCK]))
        out = m if out is None else torch.maximum(out, m)
    return out


def row_softmax_sum(
    q: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`fine_softmax_sum(logits(q))` for rows q [H, R, D], scored `ROW_BLOCK` rows at a
    time (`logits` maps rows [H, r, D] to scaled, masked logits [H, r, N])."""
    return row_sum(q, lambda rows: fine_softmax_sum(logits(rows)))


def row_sum(q: torch.Tensor, weights: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The sum of `weights(rows)` ([H, N], summed over its rows) over `ROW_BLOCK` rows of
    q [H, R, D] at a time."""
    out = None
    for r in range(0, q.shape[1], ROW_BLOCK):
        w = weights(q[:, r : r + ROW_BLOCK])
        out = w if out is None else out + w
    return out


def top_k_ids(weights: torch.Tensor, ids: torch.Tensor | None, k: int) -> torch.Tensor:
    """Best `k` per row of weights [H, N] (ids [H, N] or positions), sorted ascending."""
    top = torch.topk(weights, k, dim=-1, sorted=False).indices  # sorted by id below
    chosen = top if ids is None else torch.gather(ids, 1, top)
    return torch.sort(chosen, dim=-1).values


def range_mask(n: int, lo: int, hi: int, device=None) -> torch.Tensor:
    """[n] bool: which of tokens 0..n-1 lie in [lo, hi)."""
    t = torch.arange(n, device=device)
    return (t >= lo) & (t < hi)


def with_successors(ids: torch.Tensor, valid) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step that reuses the step before's selection (`selection.reuse`):
    ids [H, k], each head's first `valid` rows distinct and ascending (an int, or a [1]
    device tensor) -> (ids [H, 2k], use [H, 2k] bool): the ids, then each one's
    successor (id + 1) where it is not the next id already; unused rows (past `valid`,
    and the successors already there) hold the head's first id. Fixed shapes, no host
    value: the fixed-shape step runs it inside a CUDA graph.

    Why the successors: a head that copies text attends, one step later, to the token
    after the one it attended to (an induction head's target moves on by one). Reusing
    the ids alone cost perplexity 1.97 -> 4.53 at 5% (docs/fidelity.md); with their
    successors, 1.956. A successor is below the new step's range end, one past the last
    step's: it is a far token, already handed to the store."""
    H, k = ids.shape
    j = torch.arange(k, device=ids.device)
    row = (j < valid).expand(H, k)
    succ = ids + 1
    nxt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
    fresh = row & ~(((j + 1) < valid) & (nxt == succ))
    first = ids[:, :1].expand(H, k)
    both = torch.cat([torch.where(row, ids, first), torch.where(fresh, succ, first)], dim=1)
    return both, torch.cat([row, fresh], dim=1)
