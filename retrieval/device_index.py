"""`DeviceClusterIndex`: a `ClusterIndex` mirrored into fixed-capacity device buffers,
and its selection with fixed shapes (no host synchronisation, CUDA-graph capturable).

The index itself (k-means, assignment of new tokens) is still built by
`ClusterIndex`; `sync` copies its state here between decode steps. `select` then
computes, on the device, exactly what `ClusterIndex.select` computes with the
low-bit rerank, with these shapes fixed at capture time:

    clusters   [H, NC_cap]      centroids past the real count score -inf
    tokens     [H, T_cap]       assign (int32) of each token; tokens not indexed yet
                                point at the extra cluster NC_cap, which is always taken
    candidates [H, N]           N = candidate_factor * k + pad (`candidate_count`)

The range end `hi` (= context - window) is a device tensor, so the same replay
serves every step until a buffer is reallocated or `k` changes.

Where it differs from `ClusterIndex.select`: a head with fewer than k candidates
(possible only when candidate_factor * k minus the sink is below k, i.e. with
candidate_factor 1) gets token `lo` repeated instead of other tokens of the range.
With the Triton kernels (CUDA), scores are summed in another order than torch's, and
clusters whose scores tie at the cut are all taken (the ranking takes those it put
first); candidates past N are then dropped, the last in token order. Both need two
float32 scores equal to the last bit at the cut. Of candidates whose weights tie at the
cut, the earlier are kept (by the kernel and its reference; `topk` on the host keeps
any).
"""

from __future__ import annotations

import torch

from offload.backend import Backend
from retrieval.base import row_sum
from retrieval.cluster import ClusterIndex
from storage.quant import QuantKeys

CANDIDATE_PAD = 256  # candidate slots are rounded up to this many (fewer recaptures)
CLUSTER_GROWTH = 1.25  # the centroid buffers grow by this factor (they are 1 GiB at 128k
# tokens for the 8B shape: doubling could waste half of that)


class DeviceClusterIndex:
    def __init__(self, num_heads: int, head_dim: int, candidate_factor: int, device):
        self.H, self.D, self.factor, self.device = num_heads, head_dim, candidate_factor, device
        self.centroids = torch.zeros(num_heads, 0, head_dim, device=device)
        self.bias = torch.zeros(num_heads, 0, device=device)  # 0 real, -inf past the count
        self.counts = torch.zeros(num_heads, 1, device=device)  # [H, NC_cap + 1]
        self.assign = torch.zeros(num_heads, 0, dtype=torch.int32, device=device)
        self.max_count = 0  # the largest cluster (bounds the candidates)
        self.tail = 0  # tokens of [indexed, hi) at most (always candidates)
        # (epoch, tokens, first cluster and its segment's first token, cuts) at the last sync
        self._synced: tuple[int, int, int, int, int] | None = None

    @property
    def token_capacity(self) -> int:
        return self.assign.shape[1]

    @property
    def cluster_capacity(self) -> int:
        return self.centroids.shape[1]

    def sync(self, index: ClusterIndex, token_capacity: int, tail: int) -> bool:
        """Copy `index` into the buffers, growing them to hold it and `token_capacity`
        tokens (the centroids geometrically). `tail` bounds the tokens between the end of the index
        and the range end at any step until the next sync. Returns whether a buffer was
        reallocated (a captured step must then be captured again).

        Between two syncs in one epoch of the index (see `ClusterIndex.epoch`) only the
        index's end changes: new tokens or tokens cut from the last segment
        (`ClusterIndex.cuts`), and the clusters from the last segment's first on. Only
        those are copied (a full copy is 40 MB per layer at 128k tokens of the
        8B shape, every `index_refresh` tokens of a decode), after a growth too."""
        dev = self.device
        NC, T_idx = index.centroids.shape[1], index.indexed_tokens
        c0 = t0 = first_token = 0
        cuts = []
        if self._synced is not None and self._synced[0] == index.epoch:
            _, t0, c0, first_token, seen = self._synced  # (buffers past them hold what a
            cuts = index.cuts[seen:]  # full sync wrote, but for the tokens cut since)
            t0 = min([t0, *cuts])
        grown = False
        if NC > self.cluster_capacity:
            self._grow_clusters(max(NC, int(CLUSTER_GROWTH * self.cluster_capacity)), t0)
            grown = True
        if max(token_capacity, T_idx) > self.token_capacity:
            # (the caller sizes the growth: offload/tiered_step.py grows it by 1.25x)
            self._grow_tokens(max(token_capacity, T_idx))
            grown = True
        cap = self.cluster_capacity
        counts = index.counts_from(c0, first_token).float()
        self.centroids[:, c0:NC] = index.centroids[:, c0:].to(dev)
        self.bias[:, c0:NC] = 0
        self.counts[:, c0:NC] = counts.to(dev)
        self.assign[:, t0:T_idx] = index.assign[:, t0:].to(dev)
        if not c0:  # a full sync: the rest of the buffers as well
            self.centroids[:, NC:] = 0
            self.bias[:, NC:] = float("-inf")
            self.counts[:, NC:] = 0
            self.max_count = 0
        if not t0 or cuts:
            self.assign[:, T_idx:] = cap  # not indexed yet: the extra, always-taken cluster
        # (clusters before c0 have not changed; `max_count` only rises within an epoch,
        # a bound even after a cut)
        self.max_count = max(self.max_count, int(counts.max()) if counts.numel() else 0)
        self._synced = (index.epoch, T_idx, *index.last_segment, len(index.cuts))
        self.tail = tail
        return grown

    # A buffer that grows keeps what the last sync wrote (a copy on the device), so the
    # sync after a growth copies only the index's end from the host, as any other sync
    # of the epoch does: a growth during a decode at 128k tokens of the 8B shape then
    # moves a few MB over PCIe, not the whole index (1.35 GB from pageable memory).

    def _grow_clusters(self, cap: int, t0: int) -> None:
        H, D, dev, n = self.H, self.D, self.device, self.cluster_capacity
        centroids, bias, counts = self.centroids, self.bias, self.counts
        self.centroids = torch.zeros(H, cap, D, device=dev)
        self.bias = torch.full((H, cap), float("-inf"), device=dev)
        self.counts = torch.zeros(H, cap + 1, device=dev)
        self.centroids[:, :n] = centroids
        self.bias[:, :n] = bias
        self.counts[:, :n] = counts[:, :n]
        self.assign[:, t0:] = cap  # tokens not indexed yet: the extra cluster, now `cap`

    def _grow_tokens(self, cap: int) -> None:
        assign = self.assign
        self.assign = torch.full(
            (self.H, cap), self.cluster_capacity, dtype=torch.int32, device=self.device
        )
        self.assign[:, : assign.shape[1]] = assign

    def candidate_count(self, k: int) -> int:
        """N: enough candidate slots for every head (see `select`), padded."""
        need = self.factor * k + self.max_count + self.tail
        return -(-need // CANDIDATE_PAD) * CANDIDATE_PAD

    def select(
        self,
        q: torch.Tensor,
        summaries: QuantKeys,
        lo: int,
        hi: torch.Tensor,
        k: int,
        num_candidates: int,
        k_valid: torch.Tensor | None = None,
        backend=None,
    ) -> torch.Tensor:
        """q [H, G, D] (a decode step; or [H, R, D], a prefill chunk's query rows), hi a
        device tensor [1] -> token ids [H, k] in [lo, hi), in token order
        (`ClusterIndex.select` returns the same ids).

        Candidates: the best clusters by max of logits over the group until
        candidate_factor x k tokens (then one more cluster), plus the tokens not yet
        indexed; reranked by their low-bit keys (sum of softmax), top-k. With `k_valid`
        (a device tensor <= k) the candidates are those of k_valid and the first
        k_valid ids are `ClusterIndex.select(..., k_valid)`'s, the rows after them the
        first candidate: a caller with a fixed number of slots uses only those. The clusters' scores, the clusters taken, the
        candidate list and the rerank's weights are computed by `backend` (an
        `offload.backend.Backend`: Triton kernels on CUDA, whose clusters taken differ
        from the ranking's only where scores tie at the threshold); without one, by the
        kernels' torch references."""
        backend = backend or Backend(q.device)
        N = num_candidates
        cscore = backend.score_clusters(q, self.centroids, self.bias)  # [H, NC_cap]
        # [H, NC_cap + 1]: the best clusters until factor x k tokens, then one more; the
        # tokens not indexed yet (the last column) always.
        take = backend.take_clusters(cscore, self.counts[:, :-1], self.factor, k, k_valid)
        # Each head's candidates in token order, the first N (then dropped), padded with lo.
        ids, count = backend.cluster_candidates(take, self.assign, lo, hi, N)  # [H, N], [H]
        # The rerank on the candidates' low-bit keys; a prefill chunk's many query rows a
        # block at a time (a step's G rows: one block).
        sm_scale = q.shape[-1] ** -0.5
        weights = row_sum(
            q, lambda rows: backend.rerank_weights(rows, summaries, ids, count, sm_scale)
        )
        return backend.top_ids(weights, ids, k, k_valid)
